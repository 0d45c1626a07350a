"""The aiohttp app, middlewares, handlers, admin routes, app keys, cleanup contexts."""
