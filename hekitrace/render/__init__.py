"""Renderers of the views dicts (docs/snapshot.md) for people: tables, SVG, diffs.

Each module reads only plain dicts from :mod:`hekitrace.render.documents` (or a saved JSON file of
them), never live state, so the same code draws a daemon reply, a ``--from`` rebuild and
a snapshot saved last week.
"""
