"""server_stub"""
