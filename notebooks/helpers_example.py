"""A helper module beside the notebook local_modules.ipynb: it travels with the cells that use it."""


def describe(values):
    """A short summary of a list of numbers."""
    return f"{len(values)} values, mean {sum(values) / len(values):.2f}"


class Celsius:
    """A temperature, to show that instances of the notebook's own classes travel too."""

    def __init__(self, degrees):
        self.degrees = degrees

    def fahrenheit(self):
        return self.degrees * 9 / 5 + 32
