"""The one error the models layer raises: a model that cannot be named, fetched or read.

Its message names the model or file and what is wrong with it; the commands print it as is.
"""


class ModelError(Exception):
    pass
