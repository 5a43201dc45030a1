"""`cir demo`: a local web page over a `cir index` gallery (app.py; optional extra `[demo]`).

Nothing is imported here, so registering the command costs `cir --help` nothing."""
