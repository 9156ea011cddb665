from provisioners import write_connection_file

# Create connection file with auto-assigned ports
fname, connection_info = write_connection_file()
print(f"Connection file: {fname}")
print(f"Connection info: {connection_info}")

# Create with specific configuration
fname, connection_info = write_connection_file(
    ip='192.168.1.100',
    shell_port=50001,
    iopub_port=50002,
    stdin_port=50003,
    hb_port=50004,
    control_port=50005,
    kernel_name='python3'
)
