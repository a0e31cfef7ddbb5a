"""Stand-in of modules/shared.py: the loaded model, the job state and the settings textmask reads."""


class State:
    interrupted = False
    skipped = False


state = State()
sd_model = None


class Options:
    use_downcasted_alpha_bar = False
    sd_noise_schedule = "Default"


opts = Options()
