"""vtoken/zoo"""
