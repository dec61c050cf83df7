"""Errors of the input pipeline that tell the user what is wrong and how to fix it."""


class MissingDataError(FileNotFoundError):
    """A data set's files are not where they were looked for (the message says where to get them)."""


class CorruptImageError(ValueError):
    """An image could not be decoded while data.on_corrupt='fail'."""


def missing_data_message(name: str, expected: str, manual_dir: str, source: str) -> str:
    """One message: which data set, which files, where to put them, where to get them."""
    return (
        f"Data set {name!r} is not prepared and its files were not found: put {expected} in "
        f"{manual_dir} (or point data.manual_dir at the folder holding them); get them from {source}."
    )
