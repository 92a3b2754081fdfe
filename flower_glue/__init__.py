"""The Flower glue that server/ and clients/ share (neither imports the other): records and message plumbing."""
