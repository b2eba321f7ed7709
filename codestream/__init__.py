"""codestream"""
