"""Run train.midtrain, optionally SIGKILLing the process right after step --kill-at (resume tests)."""
import os
import signal
import sys

from train import midtrain


def main():
  argv = sys.argv[1:]
  hooks = []
  if "--kill-at" in argv:
    i = argv.index("--kill-at")
    kill_at = int(argv[i + 1])
    del argv[i:i + 2]

    def kill(trainer, step):
      if step == kill_at:
        trainer.state.params  # the step's result exists; die before anything else is written
        os.kill(os.getpid(), signal.SIGKILL)
    hooks.append(kill)
  sys.exit(midtrain.main(argv, hooks=hooks))


if __name__ == "__main__":
  main()
