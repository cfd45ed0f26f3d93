"""Command lines of the tests: train/ commands refuse a flag given twice, so a test's variant of a base command line
replaces the base's value instead of appending a second copy of the flag."""


def with_flags(argv: list[str], *flags_and_values: str) -> list[str]:
    """A copy of `argv` with each `--flag value` pair of `flags_and_values` in place of that flag's value (appended
    where `argv` has no such flag). Every flag here takes one value, as the train/ config flags do."""
    assert len(flags_and_values) % 2 == 0, flags_and_values
    argv = list(argv)
    for flag, value in zip(flags_and_values[::2], flags_and_values[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv
