"""The schema convention every config section follows (Literal choices checked from their type) and the errors a user
sees as one line.
"""
