"""Everything a request goes through before any work is queued, torch- and Ray-free: the body and
its JSON limits, the text rules, image decoding under decode-cost caps and fitting, control maps,
noise masks, and request resolution against a model's config and the limits. Every route (generate
JSON and GET query, validate, OpenAI's generations and edits, embeddings) calls the same
functions, so a rule holds everywhere or nowhere."""
