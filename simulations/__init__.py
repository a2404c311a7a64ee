"""Monte-Carlo studies of DropKey's claims (each a module with a config dataclass and run())."""
