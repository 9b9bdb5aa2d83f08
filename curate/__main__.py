"""``python -m curate`` and the ``curate`` script: arm Ctrl-C / SIGTERM handling before the heavy imports."""


def main() -> None:
    from .faults import install_signal_handlers, quiet_interrupt

    install_signal_handlers()
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt as exc:  # Ctrl-C while importing: exit 130 without a traceback
        quiet_interrupt(exc)
    cli_main()


if __name__ == "__main__":
    main()
