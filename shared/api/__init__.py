"""The public contract, free of torch and Ray: request and response schemas, stream events, the
vocabularies they use, wire encodings and the HTTP routes over a `Backend`; what a request goes
through before it runs is `shared.intake`."""
