"""The flow: spool, intake queue, space ledger, and the runner driving items."""
