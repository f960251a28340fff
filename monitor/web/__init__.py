"""The review page: a small local web page served by the daemon (``web:`` in the config).

``trend`` lays out the 24 h score plot, ``views`` gathers what the page shows from the running
daemon, ``app`` is the Starlette application (page, clips, verdicts) and ``server`` runs it with
uvicorn on a thread of its own. Needs the optional extra ``web`` (starlette, jinja2, uvicorn).
"""
