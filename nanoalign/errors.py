"""The one exception type for bad input: a file, row, field or flag the user gave us is wrong.

Input checks raise InputError with a message that names the file and line, the field or the flag (as typed,
e.g. `--max-prompt-len`); `train.one_line_errors` prints exactly that line. Anything else (a KeyError or an
assertion deep in our code) is a bug and keeps its traceback. A ValueError subclass, so callers that catch
ValueError still do.
"""


class InputError(ValueError):
    pass
