"""Run a stage (train.pretrain by default, or `--stage midtrain`), optionally SIGKILLing the
process right after step --kill-at (resume tests)."""
import importlib
import os
import signal
import sys


def _pop(argv, flag, default=None):
  if flag not in argv:
    return default
  i = argv.index(flag)
  value = argv[i + 1]
  del argv[i:i + 2]
  return value


def main():
  argv = sys.argv[1:]
  stage = importlib.import_module(f"train.{_pop(argv, '--stage', 'pretrain')}")
  kill_at = _pop(argv, "--kill-at")
  hooks = []
  if kill_at is not None:
    def kill(trainer, step):
      if step == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    hooks.append(kill)
  sys.exit(stage.main(argv, hooks=hooks))


if __name__ == "__main__":
  main()
