"""vtoken/bench"""
