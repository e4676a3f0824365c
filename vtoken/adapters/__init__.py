"""vtoken/adapters"""
