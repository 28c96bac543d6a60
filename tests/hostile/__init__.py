"""Hostile input, built in code: what a client can put in a request's fields, each case with the
answer the server must give."""
