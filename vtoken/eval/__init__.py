"""vtoken/eval"""
