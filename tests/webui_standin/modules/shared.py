"""Stand-in of modules/shared.py: the loaded model and the job state."""


class State:
    interrupted = False
    skipped = False


state = State()
sd_model = None
