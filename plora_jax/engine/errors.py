"""The engine's own errors, beside `inputs.InvalidInput` (bad input, naming the field) and
`outputs.RequestFailed` (a request that did not finish): what a server maps to 503."""


class EngineDead(RuntimeError):
    """The engine cannot take work: its loop died (the cause is chained) or it was closed."""


class EngineBusy(RuntimeError):
    """Work that cannot run now for want of room (KV blocks, adapter pages); retry later."""
