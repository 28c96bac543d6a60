"""The public contract, free of torch and Ray: request and response schemas, stream events, the
vocabularies they use, edge validation, wire encodings and the HTTP routes over a `Backend`."""
