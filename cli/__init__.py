"""The `apr` command line (installed as apr_cli): `main`, one thin `*_cmd.py` per command, shared `render`."""
