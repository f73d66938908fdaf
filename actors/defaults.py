"""Task defaults shared by the request model and the settings, defined once.

A module of constants only, with no imports: ``config/settings.py`` reads it
without pulling in the models (or anything else) of the ``actors`` package.
``config/default.toml`` repeats the values for its readers; a test keeps
them equal (tests/test_script_wiring.py).
"""

from __future__ import annotations

#: Seconds one attempt of a task may run (``ScrapingRequest.timeout``,
#: ``[tasks] default_timeout``).
DEFAULT_TIMEOUT = 300.0

#: Retries after the first attempt (``ScrapingRequest.max_retries``,
#: ``[tasks] max_retries``). Also the protocol's: a task record leaves
#: max_retries out at this value (``DEFAULT_MAX_RETRIES`` in
#: actors/lua/_lib.lua, kept equal by a test).
DEFAULT_MAX_RETRIES = 3
