package shmtest

const sysMemfdCreate = 319 // memfd_create on linux/amd64; the syscall package lacks it
