from provisioners import KernelManager

km = KernelManager()
km.start_kernel()

# Get connection information
conn_info = km.get_connection_info()
print(f"Shell port: {conn_info['shell_port']}")
print(f"IOPub port: {conn_info['iopub_port']}")
print(f"Transport: {conn_info['transport']}")
print(f"IP: {conn_info['ip']}")

# Load connection info into another manager
km2 = KernelManager()
km2.load_connection_info(conn_info)

# Clean up
km.cleanup_connection_file()
