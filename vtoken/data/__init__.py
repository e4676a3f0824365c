"""vtoken/data"""
