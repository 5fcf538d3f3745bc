"""Deploying a federation: certificates (``certs``, ``pki``), the server and client processes
(``server_process``, ``client_process``), and data files for edge inboxes (``data_files``)."""
