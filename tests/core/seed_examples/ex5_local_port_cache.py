from provisioners.connect import LocalPortCache

# Get port cache instance
port_cache = LocalPortCache.instance()

# Find available port
available_port = port_cache.find_available_port('127.0.0.1')
print(f"Available port: {available_port}")

# Use the port...

# Return port when done
port_cache.return_port(available_port)
