"""The network edge: websockets connections, admission, the frame-rate limiter.

``wsio`` is the one module of the gateway that reaches into websockets'
connection internals or its transport; everything else calls its functions.
"""
