// Command classify sends photos (or texts) to a classifier served by one of the daemon's
// built-in handlers, vision.classify or text.classify, and prints each item's most likely
// classes, best first, one per line:
//
//	0.4082  tiger cat
//
// Photos are sent as they are (JPEG, PNG, WebP, ...): the daemon decodes, resizes and
// normalizes them, so this program needs no image code; texts are sent as strings and the
// daemon tokenizes them. The model's metadata says which it takes (its input's meaning,
// "image" or "text"), and its published limits (items, bytes, formats) are checked before
// anything is sent. The daemon must serve the model, e.g. the example models:
//
//	.venv/bin/tensord serve --config daemon/tensord/examples/models.toml
//	go run ./examples/classify [-socket PATH] [-model NAME] [-precise] photo.jpg [more.png ...]
//	go run ./examples/classify -model sentiment "what a great film" "dull"
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"strconv"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

func main() {
	socket := flag.String("socket", "", "daemon socket (default: $TENSORD_SOCKET, /run/tensord/tensord.sock or /tmp/tensord.sock)")
	model := flag.String("model", "efficientnet", "name of the classification model in the daemon's config")
	precise := flag.Bool("precise", false, "print scores with all the digits of a float32")
	timeout := flag.Duration("timeout", time.Minute, "time limit for connecting and classifying")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: classify [flags] photo [photo ...]\n       classify -model TEXT_MODEL text [text ...]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	log.SetFlags(0)
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	c, err := shmclient.Dial(ctx, *socket, shmclient.WithName("classify"), shmclient.WithRingSize(64<<20, 0))
	if err != nil {
		log.Fatalf("classify: %v", err)
	}
	defer c.Close()

	info, err := modelInfo(ctx, c, *model)
	if err != nil {
		log.Fatalf("classify: %v", err)
	}
	input, text := "image", false
	if info != nil && len(info.Inputs) == 1 {
		input, text = info.Inputs[0].Name, info.Inputs[0].Meaning == "text"
	}
	items := make([][]byte, flag.NArg())
	for i, arg := range flag.Args() {
		if text {
			items[i] = []byte(arg)
			continue
		}
		if items[i], err = os.ReadFile(arg); err != nil {
			log.Fatalf("classify: %v", err)
		}
	}
	// One request carries every item; the request ring (64 MiB asked for above) must hold it.
	in := shmclient.FromBytes(input, nil, items)
	if info != nil {
		if info.Kind != "vision.classify" && info.Kind != "text.classify" {
			log.Printf("classify: model %q is %q, not a vision.classify or text.classify model", *model, info.Kind)
		}
		if err := info.Check(in); err != nil {
			log.Fatalf("classify: %v", err)
		}
	}
	out, err := c.Infer(ctx, *model, in)
	if errors.Is(err, shmclient.ErrUnknownModel) {
		log.Fatalf("classify: %v\n(start the daemon with --config daemon/tensord/examples/models.toml)", err)
	}
	if errors.Is(err, shmclient.ErrBadInput) && len(items) > 1 && !text {
		// The daemon names the item by its index in the batch.
		for i, path := range flag.Args() {
			log.Printf("image %d: %s", i, path)
		}
	}
	if err != nil {
		log.Fatalf("classify: %v", err)
	}
	labels, err := output(out, "labels").Strings()
	if err != nil {
		log.Fatalf("classify: %v", err)
	}
	scores := output(out, "scores").Float32s()
	k := len(scores) / len(items)
	for i, arg := range flag.Args() {
		if len(items) > 1 {
			if i > 0 {
				fmt.Println()
			}
			fmt.Printf("%s:\n", arg)
		}
		for j := i * k; j < (i+1)*k; j++ {
			if *precise {
				fmt.Printf("%s  %s\n", strconv.FormatFloat(float64(scores[j]), 'g', -1, 32), labels[j])
			} else {
				fmt.Printf("%.4f  %s\n", scores[j], labels[j])
			}
		}
	}
}

// modelInfo returns the model's metadata, or nil when the daemon does not serve it (Infer
// then says so).
func modelInfo(ctx context.Context, c *shmclient.Client, name string) (*shmclient.ModelInfo, error) {
	models, err := c.Models(ctx)
	if err != nil {
		return nil, err
	}
	for i := range models {
		if models[i].Name == name {
			return &models[i], nil
		}
	}
	return nil, nil
}

// output returns the output called name, or exits naming what the model returned instead.
func output(out []shmclient.Tensor, name string) shmclient.Tensor {
	var names []string
	for _, t := range out {
		if t.Name == name {
			return t
		}
		names = append(names, t.Name)
	}
	log.Fatalf("classify: the model returned %v, not %q: is it a vision.classify or text.classify model?", names, name)
	return shmclient.Tensor{}
}
