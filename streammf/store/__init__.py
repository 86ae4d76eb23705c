"""Where the model lives: the store contract, the in-memory twin, the Redis layout and store (its Lua
scripts in `lua/`)."""
