"""Forward: attempts over a route plan, retries, breakers, balance."""
