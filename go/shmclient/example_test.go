package shmclient_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

func ExampleDial() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// "" dials $TENSORD_SOCKET, else the default socket of the SPEC.
	c, err := shmclient.Dial(ctx, "")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	models, err := c.Models(ctx)
	if err != nil {
		log.Fatal(err)
	}
	for _, m := range models {
		if m.Name == "identity" || m.Name == "mlp" {
			fmt.Printf("%s: %v -> %v\n", m.Name, m.Inputs, m.Outputs)
		}
	}
	// Output:
	// identity: [x any[*]] -> [y any[*]]
	// mlp: [x f32[?,16]] -> [y f32[?,4]]
}

func ExampleClient_Infer() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := shmclient.Dial(ctx, "")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	x := shmclient.FromFloat32("x", []int64{2, 3}, []float32{1, 2, 3, 4, 5, 6})
	out, err := c.Infer(ctx, "identity", x)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(out[0].Name, out[0].DType, out[0].Shape, out[0].Float32s())

	batch := make([]float32, 8*16)
	out, err = c.Infer(ctx, "mlp", shmclient.FromFloat32("x", []int64{8, 16}, batch))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(out[0].Name, out[0].DType, out[0].Shape)
	// Output:
	// y f32 [2 3] [1 2 3 4 5 6]
	// y f32 [8 4]
}

func ExampleClient_NewRequest() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := shmclient.Dial(ctx, "")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	// Reserve the record, then write the input straight into shared memory.
	req, err := c.NewRequest(ctx, "identity", shmclient.TensorSpec{Name: "x", DType: shmclient.I64, Shape: []int64{4}})
	if err != nil {
		log.Fatal(err)
	}
	x := req.Input(0).Int64s()
	for i := range x {
		x[i] = int64(i * i)
	}
	resp, err := req.Do(ctx)
	if err != nil {
		log.Fatal(err)
	}
	// The outputs are views into the response ring until Release.
	defer resp.Release()
	y, _ := resp.Output("y")
	fmt.Println(y.Shape, y.Int64s())
	// Output:
	// [4] [0 1 4 9]
}

// A long-running program keeps one Client for its lifetime: the Client reconnects by
// itself when the daemon restarts, and each call's deadline bounds its wait for a session
// as well as the call. Retry safety tells what to do with a call that failed anyway.
func ExampleWithReconnect() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := shmclient.Dial(ctx, "",
		shmclient.WithReconnect(true), // the default
		shmclient.WithReconnectWait(100*time.Millisecond),
		shmclient.WithMaxReconnectWait(time.Second),
		shmclient.WithMaxReconnects(-1), // never give up (the default)
		shmclient.WithRetry(true),       // make again what the daemon refused unrun
		shmclient.WithDisconnectHandler(func(err error) { log.Printf("tensord: disconnected: %v", err) }),
		shmclient.WithReconnectHandler(func() { log.Print("tensord: reconnected") }),
	)
	if err != nil {
		log.Fatal(err) // errors.Is(err, shmclient.ErrUnavailable): no daemon at the socket
	}
	defer c.Close()

	callCtx, callCancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer callCancel()
	out, err := c.Infer(callCtx, "mlp", shmclient.FromFloat32("x", []int64{1, 16}, make([]float32, 16)))
	switch {
	case err == nil:
		fmt.Println(out[0].Name, out[0].Shape)
	case shmclient.SafeToRetry(err):
		fmt.Println("did not run; safe to send again:", err)
	default: // errors.Is(err, shmclient.ErrMayHaveRun)
		fmt.Println("may have run:", err)
	}
	// Output:
	// y [1 4]
}

// A service that may start before the daemon: Dial returns at once and the Client
// connects in the background; a handler answers 503 at once while no daemon answers.
func ExampleWithRetryOnFailedConnect() {
	ctx := context.Background()
	c, err := shmclient.Dial(ctx, "", shmclient.WithRetryOnFailedConnect(true),
		shmclient.WithFailFast(true))
	if err != nil {
		log.Fatal(err) // only a refused permission or protocol version ends up here
	}
	defer c.Close()
	for !c.Connected() { // a real service would serve 503s meanwhile
		time.Sleep(10 * time.Millisecond)
	}
	x := shmclient.FromInt64("x", []int64{2}, []int64{4, 2})
	cctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	out, err := c.Infer(cctx, "identity", x)
	if err != nil {
		fmt.Println(shmclient.HTTPStatus(err), err) // 503 while no daemon answers
		return
	}
	fmt.Println(out[0].Int64s())
	// Output:
	// [4 2]
}

// Metadata, a check before sending, outputs by name and views that return errors.
func ExampleClient_Model() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := shmclient.Dial(ctx, "")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	m, err := c.Model(ctx, "mlp")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(m.Name, m.Inputs, "->", m.Outputs, "idempotent:", m.Idempotent)
	bad := shmclient.FromFloat32("x", []int64{1, 15}, make([]float32, 15))
	fmt.Println(m.Check(bad) != nil, shmclient.HTTPStatus(m.Check(bad)))

	out, err := c.Infer(ctx, "mlp", shmclient.FromFloat32("x", []int64{1, 16}, make([]float32, 16)))
	if err != nil {
		log.Fatal(err)
	}
	y, err := out.Get("y")
	if err != nil {
		log.Fatal(err)
	}
	_, err = y.AsInt64s() // y is f32: an error, not a panic
	fmt.Println(y.Shape, err)
	// Output:
	// mlp [x f32[?,16]] -> [y f32[?,4]] idempotent: true
	// true 400
	// [1 4] shmclient: tensor "y" has dtype f32, not i64
}
