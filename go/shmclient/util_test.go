package shmclient

import "unsafe"

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// sess is the Client's current session, for tests that look inside it.
func (c *Client) sess() *session { return c.cur.Load() }
