"""Reading and writing file formats. Nothing in this package knows about optimizers."""
