"""Errors a user can fix; launch.py prints them as one line instead of a traceback."""

import re
import signal


class UserError(Exception):
  """Bad input, configuration or a run that cannot continue; the message says what to do."""


class NonFinite(UserError):
  """A loss, parameters or scores that are NaN or infinite: the model's weights diverged."""


class Interrupted(UserError):
  """A training run stopped by SIGTERM or Ctrl-C after saving the step it was at."""

  def __init__(self, signum: int, step: int, num_steps: int):
    self.exit_code = 128 + signum
    what = "interrupted" if signum == signal.SIGINT else \
        f"stopped by {signal.Signals(signum).name}"
    super().__init__(f"{what} at step {step} of {num_steps}; a checkpoint of step {step} is "
                     "saved; run the same command to resume")


def flag_error(e: Exception, args: list[str]) -> str:
  """One line for an exception raised while launch.py parses its flags."""
  text = str(e)
  if isinstance(e, AttributeError) or isinstance(e.__cause__, AttributeError) or \
      isinstance(e, KeyError):
    unknown = [a.split("=")[0] for a in args if a.startswith("--config.")]
    return (f"{' or '.join(unknown) or text}: no such config key (see the README's "
            "configuration table)")
  causes = [e]
  while causes[-1].__cause__ is not None:
    causes.append(causes[-1].__cause__)
  lines = [line.strip() for c in causes for line in str(c).splitlines() if line.strip()]
  # config_flags wraps the config file's own error in a traceback: its last line says it.
  wanted = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
  line = wanted[-1] if wanted else text
  if line.startswith("flag --"):  # absl's own: it names the flag
    return line
  line = re.sub(r"^[\w.]+(Error|Exception): ", "", line)  # a config file's exception, by name
  config = next((a for a in reversed(args) if a.startswith("--config=")), "--config")
  return f"{config}: {line}"
