"""One module per runtime; each turns a model or artifact into numpy -> numpy."""
