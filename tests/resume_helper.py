"""Run train.pretrain, optionally SIGKILLing the process right after step --kill-at (resume tests)."""
import os
import signal
import sys

from train import pretrain


def main():
  argv = sys.argv[1:]
  hooks = []
  if "--kill-at" in argv:
    i = argv.index("--kill-at")
    kill_at = int(argv[i + 1])
    del argv[i:i + 2]

    def kill(trainer, step):
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    hooks.append(kill)
  sys.exit(pretrain.main(argv, hooks=hooks))


if __name__ == "__main__":
  main()
