"""The domain: records, rules and errors. No FastAPI, no torch, no database."""
