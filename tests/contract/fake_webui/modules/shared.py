"""shared.cmd_opts, shared.opts (add_option / OptionInfo / data) and shared.state, as in A1111 1.10."""
from types import SimpleNamespace

from modules import calls

cmd_opts = SimpleNamespace(ckpt_dir=None, lora_dir=None)


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


opts = Options()


class State:
    def __init__(self):
        self.interrupted = False
        self.job = ""
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.steps_seen: list = []

    def begin(self, job="(unknown)"):
        calls.append(("state.begin", job))
        self.job, self.sampling_step, self.sampling_steps, self.interrupted = job, 0, 0, False
        self.steps_seen = []

    def end(self):
        calls.append(("state.end", self.job))
        self.job = ""

    def __setattr__(self, key, value):
        object.__setattr__(self, key, value)
        if key == "sampling_step" and hasattr(self, "steps_seen"):
            self.steps_seen.append(value)


state = State()
