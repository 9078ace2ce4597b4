"""Errors a user can fix; launch.py prints them as one line instead of a traceback."""


class UserError(Exception):
  """Bad input, configuration or a run that cannot continue; the message says what to do."""
