"""Model logs streamed to viewers: ``stream`` (the SSE follow of one model's log) on ``fanout`` (one
Redis reader per watched model, fanned out to all its viewers).
"""
