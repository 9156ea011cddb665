from provisioners import find_connection_file, KernelManager

# Find existing connection file
try:
    conn_file = find_connection_file('kernel-12345.json')
    print(f"Found connection file: {conn_file}")
except IOError:
    print("Connection file not found")

# Load connection in kernel manager
km = KernelManager()
km.load_connection_file(conn_file)

# Create client from loaded connection
kc = km.client()
