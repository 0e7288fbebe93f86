"""Flag-value parsers shared by the commands: each turns text into a value or a one-line UserError."""

from patchbench.errors import UserError


def whole_number(flag):
    def parse(text):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{flag} {text!r}: need a whole number") from None
    return parse


def number(flag):
    def parse(text):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{flag} {text!r}: need a number") from None
    return parse
