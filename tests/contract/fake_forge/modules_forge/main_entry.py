from modules import calls


def checkpoint_change(ckpt_name, save=True, refresh=True):
    calls.append(("checkpoint_change", ckpt_name))
    return True
