"""Developer tools run from a source checkout (not shipped in the wheel): `python -m tools.NAME` or
`python tools/NAME.py` from the repository root."""
