"""Monte-Carlo studies of DropKey's claims: each a module exporting one ``STUDY`` (see :mod:`simulations.registry`)."""
